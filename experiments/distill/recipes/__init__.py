"""Recipes: method name -> build(config, setup) -> common.Plan. One module per method family."""

from experiments.distill.recipes import consistency, distribution, guided, trajectory

RECIPES = {**trajectory.RECIPES, **consistency.RECIPES, **distribution.RECIPES, **guided.RECIPES}

__all__ = ["RECIPES"]
