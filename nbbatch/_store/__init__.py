"""The DuckDB store: schema, the single writer, and readers. Needs only ``nbbatch._events``."""
