#!/usr/bin/env bash
# Every run of experiments/evci_2020_rigl, one after another (each folder resumes if killed).
# LeNet-300-100 on MNIST, 3 replicates, 5,000 steps per level (conf/experiment/rigl_lenet_mnist.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/evci_2020_rigl/runs
preset=experiment=rigl_lenet_mnist
# the IMP ticket: 20.63% of each layer's remaining weights per level, 13 levels:
# 79.4 63.0 50.0 ... 19.8 (level 7) ... 9.9 (level 10) ... 4.96% (level 13) of the weights remain
lottery $preset prune.schedule=iterative prune.levels=13 prune.rate=0.2063 \
    hydra.run.dir=$out/imp
# the methods that train once per level, at 80, 90 and 95% sparsity
for schedule in static set rigl gradual; do
  for sparsity in 0.8 0.9 0.95; do
    lottery $preset prune.schedule=$schedule prune.rate=$sparsity \
        hydra.run.dir=$out/${schedule}_$sparsity
  done
done
# a 2:4 ticket beside the unstructured ticket at 50% (one level of IMP each), with random pruning
lottery $preset prune.schedule=iterative prune.structure=nm 'branches=[ticket,random_prune]' \
    hydra.run.dir=$out/nm_2_4
lottery $preset prune.schedule=iterative prune.rate=0.5 'branches=[ticket,random_prune]' \
    hydra.run.dir=$out/unstructured_0.5
