"""coe: the service — config, engines, memory tiers, scheduler, Ray Serve app, HTTP schemas, CLI.

Imports flow one way: ``coe`` uses ``routers`` and ``expert_registry``; they never import ``coe``.
"""

__version__ = "0.1.0"
