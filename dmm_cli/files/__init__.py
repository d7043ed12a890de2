"""Files on disk: atomic writes, streamed safetensors, hashing, the $DMM_HOME records and PNG pictures."""
