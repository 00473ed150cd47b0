"""Validation renders: `plan` (headers only: what is rendered and how it must be sampled), `pipeline` (the
diffusers pipeline built through the stream), `checks` (what makes an image pass), `run` (the command)."""
