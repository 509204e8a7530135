"""Storage: safetensors headers and I/O, model directories, the hub cache, the content-addressed cache,
the lockfile and atomic writes. Knows nothing of recipe syntax."""
