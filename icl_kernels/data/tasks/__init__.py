"""The task registry: task definitions, their data sources (package files, local files, the hub) and the built-in catalog."""
