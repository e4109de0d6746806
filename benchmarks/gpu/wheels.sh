#!/usr/bin/env bash
# Downloads into .whl/ the cp312 wheels that playground.sh and llm.sh install on a GPU machine
# without network access (Python 3.12, CUDA torch and jax already there). Run it from the
# repository root on a machine that reaches PyPI; copy .whl/ along with the tree.
#
#   bash benchmarks/gpu/wheels.sh
set -euo pipefail
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --dest .whl \
    torchrl==0.14.1 tensordict==0.14.3 mujoco==3.17.0 mujoco-mjx==3.17.0 playground==0.2.0 \
    brax==0.14.2 ml-collections==1.1.0 mediapy==1.2.7 trimesh==5.2.0 jaxopt==0.8.5 \
    tensorboardx==2.6.5 flask==3.1.3 flask-cors==6.0.5 pyvers==0.2.3 hoptorch==0.1.4 \
    orjson==3.13.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0
ls .whl
