"""Recipes: method name -> build(config, setup) -> common.Plan. One module per method family."""

from experiments.distill.recipes import trajectory

RECIPES = {**trajectory.RECIPES}

__all__ = ["RECIPES"]
