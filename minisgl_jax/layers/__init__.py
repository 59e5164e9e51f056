"""What a model's forward pass calls, below the models and the engine: attention over the paged KV
cache (one backend per phase) and the tensor-parallel collectives of a step."""
