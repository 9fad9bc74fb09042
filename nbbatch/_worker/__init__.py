"""The per-worker side: batch loop, checkpoint barrier, reducers. Never touches DuckDB."""
