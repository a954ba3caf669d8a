"""The swarm contract: records, DHT keys, validators, leases, identity, the artifact store and the bootstrap node.

Imports nothing from the rest of isles: everything else depends on it."""
