"""The volunteer client: the command line, the join and aggregate loops, and the demo."""
