#!/usr/bin/env bash
# Run here, before a session's device check: the wheels bench/gpu_check.sh installs on the lent GPU machine.
# That machine has Python 3.12 with torch, transformers, numpy, pandas and pyarrow, and no network; lmscale's
# bench needs these besides (pydantic for the config, datasets for the batch types, DeepSpeed for the fused
# loss). They go to .whl/ (ignored by git), which the device tool carries: run(carry=[".whl"], ...).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing-extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0
# DeepSpeed publishes no wheel: build its pure-Python one (its C++ ops are compiled where they are first used).
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls .whl && du -sh .whl
