"""Training objectives behind one interface, chosen by name from a registry."""

from vlp.objectives import clip as _clip  # noqa: F401  (registers "clip")
from vlp.objectives import convirt as _convirt  # noqa: F401  (registers "convirt")
from vlp.objectives import pyramidclip as _pyramidclip  # noqa: F401  (registers "pyramidclip")
from vlp.objectives import siglip as _siglip  # noqa: F401  (registers "siglip")
from vlp.objectives.base import Objective, total_loss
from vlp.objectives.prior import objective as _prior  # noqa: F401  (registers "prior", "prior_reference")
from vlp.objectives.protoclip import objective as _protoclip  # noqa: F401  (registers "protoclip")
from vlp.objectives.registry import create_objective, list_objectives, objective_class

__all__ = ["Objective", "create_objective", "list_objectives", "objective_class", "total_loss"]
