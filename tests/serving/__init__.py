"""Serving tests: OpenAI-compatible server, media safety, CLI, web page (a package, so test
module names never clash with other test folders)."""
