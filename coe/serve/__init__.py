"""Ray Serve wrappers around the plain ``Router`` and ``ExpertPool`` objects, plus the HTTP ingress."""
