"""Process-level runtime: which rank this process is, and when ranks meet."""
