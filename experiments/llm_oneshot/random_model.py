"""Write a randomly initialised model of a published shape (Hugging Face layout, with the
byte-level tokenizer): for timing and memory only, its perplexity means nothing.

    python experiments/llm_oneshot/random_model.py gpt2-small OUT_DIR    # 124M, GPT-2
    python experiments/llm_oneshot/random_model.py tinyllama OUT_DIR     # 1.1B, Llama (GQA)

Weights normal(0, 0.02) (the papers' initialisation), norms 1, biases 0, drawn with NumPy
one tensor at a time and written in the shape's dtype (bfloat16 for TinyLlama, as its
release). Calibration ids are bytes (< 256), within either vocabulary.
"""

import sys
from pathlib import Path

import numpy as np

from lottery.llm import hf, model
from lottery.llm.spec import from_config
from lottery.lm.export import byte_tokenizer

SHAPES = {
    "gpt2-small": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
                   "n_embd": 768, "n_layer": 12, "n_head": 12, "activation_function":
                   "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                   "architectures": ["GPT2LMHeadModel"], "dtype": "float32"},
    "tinyllama": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
                  "intermediate_size": 5632, "num_hidden_layers": 22,
                  "num_attention_heads": 32, "num_key_value_heads": 4,
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                  "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16"},
}


def main(shape: str, out: Path) -> None:
    spec = from_config(SHAPES[shape])
    rng = np.random.default_rng(0)
    writer = hf.Writer(out, spec, shard_bytes=1024 ** 3)

    def draw(path, leaf):
        name = path[-1].key  # the leaf's name: kernel, embedding, scale or bias
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32))

    import jax

    shapes = model.shapes(spec)
    a, b = model.block_path(spec)
    for layer, block in shapes[a][b].items():  # one block at a time: little memory
        writer.add(jax.tree_util.tree_map_with_path(draw, block), (a, b, layer))
    writer.add(jax.tree_util.tree_map_with_path(draw, model.outer(spec, shapes)))
    folder = writer.close()
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    print(f"{shape}: {count:,} parameters in {folder}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
