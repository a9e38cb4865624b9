"""Loading TransformerLens models (registered names, hub ids, local folders, offline conversions), their architectures and backends, and sentence encoders."""
