"""Sealed files into the object store: the stores and their layout, the upload of an app-hour's
files (merging late data), and the hour's tail files archived together."""
