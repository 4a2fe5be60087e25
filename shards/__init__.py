"""Build, check and generate ViLBERT shard sets (`python -m shards --help`)."""
