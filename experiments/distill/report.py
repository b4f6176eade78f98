"""The run's markdown table and its figure (coupling error against NFE)."""

from __future__ import annotations

import os

def table(rows: list[dict]) -> str:
  """Markdown: one line per (method, NFE); distribution and mode columns where they were scored."""
  has_q = any("sliced_w2" in r for r in rows)
  has_modes = any("mode_cov_error" in r for r in rows)
  has_fd = any("fd_digits" in r for r in rows)
  head = "| method | NFE | coupling error median | RMS |"
  head += " sliced W2 (floor) | MMD² (floor) |" if has_q else ""
  head += " mode weight TV (floor) | mode cov error (floor) |" if has_modes else ""
  head += " FD-digits (floor) | digits IS |" if has_fd else ""
  lines = [head + " ms |", "|---|---:|---:|---:|" + ("---:|---:|" if has_q else "")
           + ("---:|---:|" if has_modes else "") + ("---:|---:|" if has_fd else "") + "---:|"]
  for r in sorted(rows, key=lambda r: (r["nfe"], r["method"].startswith("teacher"), r["median"])):
    mark = "†" if r.get("renoised") else ""
    line = f"| {r['method']} | {r['nfe']} | {r['median']:.2e}{mark} | {r['rms']:.2e}{mark} |"
    if has_q:
      line += (f" {r['sliced_w2']:.3f} ({r['sliced_w2_floor']:.3f}) | {r['mmd2']:.1e} "
               f"({r['mmd2_floor']:.0e}) |")
    if has_modes:
      line += (f" {r['mode_weight_tv']:.3f} ({r['mode_weight_tv_floor']:.3f}) |"
               f" {r['mode_cov_error']:.3f} ({r['mode_cov_error_floor']:.3f}) |")
    if has_fd:
      line += f" {r['fd_digits']:.1f} ({r['fd_digits_floor']:.1f}) | {r['is_digits']:.2f} |"
    lines.append(line + f" {r['ms']:.1f} |" + (" NaN!" if r.get("nan") else ""))
  if any(r.get("renoised") for r in rows):
    lines += ["", RENOISED_NOTE]
  if has_fd:
    r = next(r for r in rows if "fd_digits" in r)
    lines += ["", FD_NOTE.format(exact=r["fd_digits_exact"], floor=r["fd_digits_floor"],
                                 std=r["fd_digits_floor_std"], n=r["fd_digits_floor_n"])]
  return "\n".join(lines) + "\n"


FD_NOTE = ("FD-digits: the Frechet distance of the classifier features of the samples to the "
           "digits8 train split's (metrics/digits.py); floor: {n} held-out test digits, "
           "{floor:.1f} ± {std:.1f} over 10 draws; the teacher's exact PF-ODE map of the "
           "same noise: {exact:.1f}.")

RENOISED_NOTE = ("† the sampler re-noises between calls: its sample depends on fresh noise, not on "
                 "x_T alone, so its distance to the exact map of x_T is not a measure of it; read "
                 "its distribution columns.")


def figure(rows: list[dict], workdir: str, title: str) -> None:
  """Coupling error vs NFE for students and the teacher; for 2-D data, student samples too."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name in dict.fromkeys(r["method"] for r in rows):
    pts = sorted((r["nfe"], r["median"]) for r in rows if r["method"] == name and r["nfe"] > 0)
    if not pts:
      continue
    teacher = name.startswith("teacher")
    ax.loglog(*zip(*pts), marker="o" if not teacher else "s", ls="--" if teacher else "-",
              label=name, ms=4)
  ax.set_xlabel("NFE")
  ax.set_ylabel("median per-sample error vs the exact flow map")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "distill.png"), dpi=110)
  plt.close(fig)


__all__ = ["table", "figure"]
