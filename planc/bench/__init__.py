"""`planc bench`: replay a workload against an OpenAI-compatible server and report what clients saw.

- `config`: what a run does (BenchConfig, tenants); `client`: one timed streaming request;
- `loadgen`: open and closed loop within the caps; `run`: variants, requests, tenants, the run;
- `metrics`: percentiles, throughput, errors, SLOs; `result`: the JSON schema (also a simulator's);
- `console`, `html`, `svg`: the terminal table, the HTML report and its charts; `server`: --bundle.
"""
from planc.bench.config import BenchConfig, Tenant, make_config, parse_tenant
from planc.bench.result import SCHEMA, RequestRecord, load_result, write_result

__all__ = ["BenchConfig", "Tenant", "make_config", "parse_tenant", "SCHEMA", "RequestRecord", "load_result",
           "write_result"]
