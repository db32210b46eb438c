"""What the model is, with no algorithm: the dataflow tracer, producer forms, module-name arithmetic."""
