"""What the server and the sites share to run a federation, whatever the science: the wire (specs and packed
weights), aggregation and validation, exact and secure sums, and the strategies."""
