"""Interactions in, prepared Parquet out: readers, the built-in generator, the downloader, filtering and splits."""
