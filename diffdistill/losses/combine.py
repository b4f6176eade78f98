"""A weighted sum of losses on the same player: L = sum_k w_k L_k(params, batch, rng_k, **in_k).

Each term is a loss function of the library's contract `loss_fn(params, batch, rng, **inputs)
-> (loss, aux)`. The combined loss is one function of the same contract, so it is an `Update`'s
`loss_fn` like any other (e.g. consistency distillation + 0.1 x DSM on one student):

    loss = combine({"cd": (cd_fn, 1.0), "dsm": (dsm_fn, 0.1)},
                   routes={"cd": {"teacher_params": "teacher_params",
                                  "target_params": "target_params"}})
    loss(params, batch, rng, teacher_params=..., target_params=...)

Term k draws its randomness from fold_in(rng, k) (k: the term's position), so a term's draws do
not change when another term is added after it. `routes[name]` maps the term's keyword to the
combined function's keyword (a sequence of names routes each under its own name); a term without
a route gets no inputs. aux holds every term's aux under "<name>/", its unweighted loss as
"<name>/loss", and the weighted total as "loss".
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def combine(terms: Mapping[str, tuple[LossFn, float]], *,
            routes: Mapping[str, Mapping[str, str] | Sequence[str]] | None = None) -> LossFn:
  """The weighted sum of `terms` {name: (loss_fn, weight)} (module docstring)."""
  if not isinstance(terms, Mapping) or not terms:
    raise ValueError(f"terms must be a non-empty mapping name -> (loss_fn, weight), got {terms!r}.")
  names = list(terms)
  for name, term in terms.items():
    if (not isinstance(term, tuple) or len(term) != 2 or not callable(term[0])
        or isinstance(term[1], bool) or not isinstance(term[1], (int, float))):
      raise ValueError(f"terms[{name!r}] must be (loss_fn, weight: float), got {term!r}.")
    if "/" in name:
      raise ValueError(f"term names prefix the aux and may not contain '/', got {name!r}.")
  routes = dict(routes or {})
  unknown = sorted(set(routes) - set(names))
  if unknown:
    raise ValueError(f"routes name terms {unknown} that are not among {names}.")
  routes = {k: (dict(v) if isinstance(v, Mapping) else {n: n for n in v})
            for k, v in routes.items()}
  accepted = {src for route in routes.values() for src in route.values()}

  def loss_fn(params: Any, batch: Any, rng: jax.Array, **inputs):
    extra = sorted(set(inputs) - accepted)
    if extra:
      raise ValueError(f"inputs {extra} are routed to no term (routes: {routes}).")
    total = jnp.zeros((), jnp.float32)
    aux = {}
    for k, name in enumerate(names):
      fn, weight = terms[name]
      route = routes.get(name, {})
      missing = sorted(src for src in route.values() if src not in inputs)
      if missing:
        raise ValueError(f"term {name!r} needs inputs {missing}, which were not given.")
      value, term_aux = fn(params, batch, jax.random.fold_in(rng, k),
                           **{kw: inputs[src] for kw, src in route.items()})
      total = total + weight * value
      aux.update({f"{name}/{key}": v for key, v in term_aux.items()})
      aux[f"{name}/loss"] = value
    aux["loss"] = total
    return total, aux

  return loss_fn


__all__ = ["combine"]
