"""Role tables of the real DiT families (diffusers 0.42 module names), and where each odd layer goes.

* FLUX.1: dual-stream blocks have image (``attn.to_*``, ``ff``) and text (``attn.add_*_proj``,
  ``to_add_out``, ``ff_context``) paths, each with its own adaLN (``norm1``, ``norm1_context``).
  Single-stream blocks have q/k/v and ``proj_mlp`` (D -> 4D) but no ``to_out``: ``proj_out``
  (5D -> D, role ``fused.out``) projects the concatenation of attention and MLP outputs, so it is
  a block linear and gets the method. ``norm.linear`` is their adaLN.
* Wan 2.1: no per-block modulation linear; each block adds a learned ``scale_shift_table`` parameter
  to the shared ``condition_embedder.time_proj`` (D -> 6D). That projection sits outside the blocks
  and, like the timestep MLP it belongs to, stays in source precision (role ``embed``).
  ``attn2`` is cross-attention (queries from video tokens, keys/values from text): roles ``ctx.*``.
* CogVideoX: joint attention over concatenated text+video tokens in one ``attn1``; two adaLN
  linears per block (``norm1``, ``norm2``: time_embed_dim -> 6D).
* Z-Image: one block type in three stacks (``noise_refiner``, ``context_refiner``, ``layers``);
  SwiGLU FFN ``w2(silu(w1 x) * w3 x)`` (w1 gate, w3 up, w2 down); ``adaLN_modulation.0`` is the
  modulation (absent in the context refiner); the ModuleDict keys contain a dash (``2-1``).
* Attention score/softmax/PV matmuls are not ``nn.Linear`` in any family (SDPA processors); they
  stay in source precision.
"""

from __future__ import annotations

from orbitquant.harness.adapters.roles import ATTN_RULES as _ATTN
from orbitquant.harness.adapters.roles import RoleTable

_FD = r"(?P<stack>transformer_blocks)\.(?P<block>\d+)\."
_FS = r"(?P<stack>single_transformer_blocks)\.(?P<block>\d+)\."
FLUX_ROLES = RoleTable("flux", (
    *((_FD + r"attn\." + n, r) for n, r in _ATTN),
    (_FD + r"attn\.add_q_proj", "ctx.q"), (_FD + r"attn\.add_k_proj", "ctx.k"),
    (_FD + r"attn\.add_v_proj", "ctx.v"), (_FD + r"attn\.to_add_out", "ctx.out"),
    (_FD + r"ff\.net\.0\.proj", "ff.up"), (_FD + r"ff\.net\.2", "ff.down"),
    (_FD + r"ff_context\.net\.0\.proj", "ctx.ff.up"), (_FD + r"ff_context\.net\.2", "ctx.ff.down"),
    (_FD + r"norm1(_context)?\.linear", "adaln"),
    (_FS + r"attn\.to_q", "attn.q"), (_FS + r"attn\.to_k", "attn.k"), (_FS + r"attn\.to_v", "attn.v"),
    (_FS + r"proj_mlp", "ff.up"), (_FS + r"proj_out", "fused.out"),
    (_FS + r"norm\.linear", "adaln"),
    (r"(x_embedder|context_embedder|time_text_embed\..+)", "embed"),
    (r"(norm_out\.linear|proj_out)", "final"),
), stacks=("transformer_blocks", "single_transformer_blocks"))

_W = r"(?P<stack>blocks)\.(?P<block>\d+)\."
WAN_ROLES = RoleTable("wan", (
    *((_W + r"attn1\." + n, r) for n, r in _ATTN),
    *((_W + r"attn2\." + n, r.replace("attn.", "ctx.")) for n, r in _ATTN),
    (_W + r"ffn\.net\.0\.proj", "ff.up"), (_W + r"ffn\.net\.2", "ff.down"),
    (r"condition_embedder\..+", "embed"),  # time/text MLPs and the shared time_proj (D -> 6D)
    (r"proj_out", "final"),
), stacks=("blocks",))

_C = r"(?P<stack>transformer_blocks)\.(?P<block>\d+)\."
COGVIDEOX_ROLES = RoleTable("cogvideox", (
    *((_C + r"attn1\." + n, r) for n, r in _ATTN),
    (_C + r"ff\.net\.0\.proj", "ff.up"), (_C + r"ff\.net\.2", "ff.down"),
    (_C + r"norm[12]\.linear", "adaln"),
    (r"(patch_embed\..+|time_embedding\..+)", "embed"),
    (r"(norm_out\.linear|proj_out)", "final"),
), stacks=("transformer_blocks",))

_Z = r"(?P<stack>noise_refiner|context_refiner|layers)\.(?P<block>\d+)\."
ZIMAGE_ROLES = RoleTable("zimage", (
    *((_Z + r"attention\." + n, r) for n, r in _ATTN),
    (_Z + r"feed_forward\.w1", "ff.gate"), (_Z + r"feed_forward\.w3", "ff.up"), (_Z + r"feed_forward\.w2", "ff.down"),
    (_Z + r"adaLN_modulation\.0", "adaln"),
    (r"(all_x_embedder\..+|cap_embedder\..+|t_embedder\..+)", "embed"),
    (r"all_final_layer\..+", "final"),
), stacks=("noise_refiner", "context_refiner", "layers"))
