"""Routing: sentence encoder, stage-1 category classifier, stage-2 capability scoring and policy."""
