"""The method core: configs, registry, module matching, model operations, adapter I/O."""
