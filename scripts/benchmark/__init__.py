"""The benchmark behind `scripts/bench.py` (docs/benchmarks.md).

One module per section (`peak`, `train` with `pretrain`, `encode`, `search`, `ann`,
`cascade`, `cross`, `eval`, `loader`, `serve`), registered in `sections`; the pieces they
share: `context` (sizes, result row, run context), `measure` (timing and numerical
comparisons), `flops` (the FLOP model behind MFU), `models` (every model the benchmark
builds), `batches` (synthetic in-memory batches), `synthetic_dbs` (a synthetic txt_db +
img_db on disk), `http_load` (the server and HTTP clients of `serve`), `results` (table,
environment record, JSON file), `runner` (sections under time limits) and `cli`
(`parse_args`, `main`).
"""
