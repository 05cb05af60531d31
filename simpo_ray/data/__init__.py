"""Preference data: sources (hub, local files, bundled) -> normalised rows -> tokens, cached on
disk and shared with the workers through the object store. No model, no Tune."""
