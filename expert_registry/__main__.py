"""``python -m expert_registry`` = ``coe-registry``."""

from expert_registry.cli import main

main()
