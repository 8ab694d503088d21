"""LoRA adapter versions: the registry, validation before loading, and the replicas' hot-swap watcher."""
