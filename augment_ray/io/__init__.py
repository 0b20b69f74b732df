"""Reading input shards into rows and writing rows out (output, rejects, manifest)."""
