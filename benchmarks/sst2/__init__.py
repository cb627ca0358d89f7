"""SST-2 with a pretrained MiniLM-L6 teacher: kdscale's pipeline against the plain recipe."""
