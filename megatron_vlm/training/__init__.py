"""Training: the one place that wires data, model, optimizer and checkpoint together."""
