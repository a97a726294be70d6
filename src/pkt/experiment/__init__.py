"""The whole study in one command: methods × tasks × seeds, cached stages, a manifest and a report."""
