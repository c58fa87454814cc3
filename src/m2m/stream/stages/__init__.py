"""The stream's stages: batches -> cold / warm (host gather) -> hot (device) -> prefetch."""
