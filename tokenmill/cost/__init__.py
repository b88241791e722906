"""What serving costs: each request's share of the measured busy time, the machine's price, capacity plans."""
