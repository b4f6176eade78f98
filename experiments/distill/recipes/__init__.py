"""Recipes: method name -> build(config, setup) -> common.Plan. One module per method family."""

from experiments.distill.recipes import consistency, trajectory

RECIPES = {**trajectory.RECIPES, **consistency.RECIPES}

__all__ = ["RECIPES"]
