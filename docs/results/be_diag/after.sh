#!/bin/bash
# runs after the main compare: BatchEnsemble diagnosis (lr x init_std, seed 0, no tuning), then the tweet dataset
cd /work/main
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
while pgrep -f "output-dir runs/compare14 " > /dev/null; do sleep 10; done
B="data.train_size=200 data.val_size=80 data.test_size=200 data.ood_size=100 model.max_length=32 training.max_epochs=3"
for spec in "0.01 0.1" "0.01 0.01"; do
  set -- $spec
  .venv/bin/lora-ensemble compare --config configs/compare_bbc_minilm.yaml --methods batch_ensemble --seeds 1 --trials 0 \
    --output-dir runs/be_diag/lr$1_std$2 --set $B compare.batch_ensemble.training.lr=$1 compare.batch_ensemble.method.init_std=$2
done
.venv/bin/lora-ensemble compare --config configs/compare_bbc_minilm.yaml --methods lora_ensemble,single_lora --seeds 3 --trials 2 \
  --output-dir runs/compare14_tweets --set $B data.name=tweet_sentiment data.ood_class=neutral
