"""A tiny CLIP BPE tokenizer, written to disk by this code (no download).

The vocabulary has the 256 byte-level symbols (alone and with the ``</w>`` word end), the merges
that spell a few hundred common English words, and ``<|startoftext|>`` / ``<|endoftext|>`` as the
two highest ids (as in CLIP). Any text tokenizes: unknown words fall back to byte symbols.
"""

import atexit
import functools
import json
import os
import shutil
import tempfile

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

COMMON_WORDS = """
a an the of and or in on at to with from by for as is are was be it its this that these those
photo photograph picture image painting drawing portrait landscape illustration render art
of high quality detailed sharp realistic beautiful cinematic lighting light dark bright soft
cat dog bird horse fish cow lion tiger bear fox wolf rabbit mouse dragon animal animals
man woman person people child boy girl face eyes hair hand hands smile old young
red green blue yellow black white orange purple pink brown gray grey gold silver color colors
sky sun moon star stars cloud clouds rain snow fog night day sunset sunrise morning evening
tree trees forest flower flowers grass garden field mountain mountains hill river lake sea
ocean beach water wave waves island desert rock stone sand ice fire smoke
city street road house houses building buildings tower bridge castle church room window door
car cars train boat ship plane bike table chair bed book cup bottle food fruit apple bread
big small large little tall long short wide new old happy sad cute funny strange
standing sitting running walking flying sleeping looking holding wearing playing eating
style by artist trending artstation digital oil watercolor sketch anime cartoon hd
very highly ultra super masterpiece best quality professional studio background foreground
astronaut riding space planet robot knight wizard king queen warrior city futuristic
""".split()


def _bytes_to_unicode():
    """CLIP's reversible map from the 256 byte values to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, codes)}


def _apply_merges(parts, ranks):
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(parts)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiny_vocab_and_merges(words=COMMON_WORDS):
    """Return ``(vocab: dict[str, int], merges: list[str])`` of the tiny tokenizer.

    Words are added in order: the word is split with the merges so far, then new merges join
    the pieces left to right, so each listed word becomes a single token.
    """
    byte_symbol = _bytes_to_unicode()
    symbols = list(byte_symbol.values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    ranks = {}
    for word in dict.fromkeys(w.lower() for w in words):
        chars = [byte_symbol[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        parts = _apply_merges(chars, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab_list.append(parts[0] + parts[1])
            parts[:2] = [parts[0] + parts[1]]
    vocab_list += [BOS, EOS]
    merges = [f"{a} {b}" for (a, b) in ranks]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tiny_tokenizer(path):
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into directory ``path``."""
    os.makedirs(path, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
    return path


@functools.lru_cache(maxsize=None)
def _default_dir():
    """A per-process temp dir holding the tiny tokenizer files, removed at exit."""
    path = tempfile.mkdtemp(prefix="tomesd_ext_tokenizer_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return write_tiny_tokenizer(path)


def build_tokenizer(path=None):
    """Load the tiny tokenizer, first writing its files into ``path`` (default: a temp dir
    shared by the process).

    Returns a fresh ``transformers.CLIPTokenizer``: ``model_max_length`` 77, pads with
    ``<|endoftext|>``; ``tok(prompt, padding="max_length")`` gives 77 ids per prompt.
    """
    path = _default_dir() if path is None else write_tiny_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)
