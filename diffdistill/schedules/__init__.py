"""Forward processes x_t = alpha(t) x0 + sigma(t) eps (`processes`) and the distributions of
training times on them (`time_samplers`), under one name:

    schedule = schedules.get("vp_linear")            # or schedules.VPLinear(), ...
    sampler = schedules.resolve_time_sampler("lognormal")
    t = sampler.sample(rng, (B,), schedule=schedule)

See each module's docstring for the conventions (valid times, numerics near the ends).
"""

from diffdistill.schedules.processes import (EDM, SCHEDULES, VE, RectifiedFlow, Schedule,
                                             TrigFlow, VPCosine, VPDiscrete, VPLinear,
                                             broadcast_to, get, resolve)
from diffdistill.schedules.time_samplers import (TIME_SAMPLERS, LogitNormalTime, LogNormalSigma,
                                                 TimeSampler, UniformLogSNR, UniformTime,
                                                 get_time_sampler, importance_weight,
                                                 resolve_time_sampler)

__all__ = [
    "Schedule", "VPLinear", "VPCosine", "VPDiscrete", "VE", "EDM", "RectifiedFlow", "TrigFlow",
    "SCHEDULES", "get", "resolve", "TimeSampler", "UniformTime", "LogNormalSigma",
    "LogitNormalTime", "UniformLogSNR", "TIME_SAMPLERS", "get_time_sampler",
    "resolve_time_sampler", "importance_weight", "broadcast_to",
]
