"""CODI (continuous chain of thought by self-distillation; Shen et al., 2025): one model, with LoRA
adapters on a frozen base, is both the teacher (the explicit CoT without its last step, then the
answer) and the student (the question, `<|bot|>`, N continuous thoughts through a projection,
`<|eot|>`, the answer); the student's hidden states at the token that predicts the answer are pulled
towards the teacher's, at the embedding output and every layer.

The rules are the reference code's (zhenyi4/codi; METHODS.md section 3), on icot's engine and
sequence format (`sequences.py`). Options: the `codi:` section of a recipe; departures are named in
`sequences.py` and `stage.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from icot.config import dropout_probability, option
from icot.registry import Method, Mode, StageSpec, register


@dataclass
class CodiConfig:
    start: Literal["base", "teacher"] = option(
        "base", help="the weights the adapters sit on: base (model.name_or_path, pretrained, as the reference; "
                     "a model from scratch without one) or teacher (the shared explicit-CoT teacher's export; "
                     "inputs.start.export picks the epoch)")
    latents: int = option(6, minimum=1, help="continuous thoughts between <|bot|> and <|eot|> (the reference's "
                                             "num_latent, and inf_latent_iterations at inference)")
    projection_dim: int = option(768, minimum=1, help="the projection's inner width (prj_dim): Dropout, Linear(d, "
                                                      "this), GELU, Linear(this, d), LayerNorm(d)")
    projection_dropout: float = option(0.0, minimum=0.0, check=dropout_probability,
                                       help="the projection's dropout (prj_dropout)")
    projection_norm: bool = option(True, help="end the projection with LayerNorm (false: the reference's "
                                              "prj_no_ln)")
    include_last_step: bool = option(False, help="keep the CoT's last step in the teacher sequence (the reference "
                                                 "drops it: include_last_cot false)")
    distill_positions: Literal["first", "answer"] = option(
        "first", help="where the student's states are pulled towards the teacher's: first (the token that "
                      "predicts the answer's first token, the reference) or answer (that token and every later "
                      "one of the answer, each predicting the next: an icot option for answers of many tokens, "
                      "such as a multiplication's digits, whose first token alone says little)")
    distill_loss: Literal["smooth_l1", "l2"] = option("smooth_l1", help="the distillation loss per layer "
                                                                        "(SmoothL1 with beta 1, or MSE)")
    distill_div_std: bool = option(True, help="divide each layer's distillation loss by the std of the teacher's "
                                              "selected states (twice for l2, as the reference)")
    distill_weight: float = option(1.0, minimum=0.0, resumable=True,
                                   help="weight of the distillation loss (distill_loss_factor; 20 in the "
                                        "reference's Llama scripts)")
    teacher_weight: float = option(1.0, minimum=0.0, resumable=True,
                                   help="weight of the teacher's cross-entropy (ref_loss_factor); the student's "
                                        "has weight 1")
    teacher_passes: Literal[1, 2] = option(
        2, help="2: the teacher runs once under no_grad for the distillation targets and once with grad for its "
                "cross-entropy, as the reference (two dropout masks); 1: one pass with grad, its states "
                "detached as the targets (a third fewer forwards; equal when dropout is off)")
    reference_masking: bool = option(
        False, help="the reference's masking (its fix_attn_mask false, the setting of its released "
                    "checkpoints): positions count from the padded row's first column, and the thought and "
                    "answer passes attend to the prompt's left padding. Off (default): masked padding and "
                    "positions from each row's first token, so an answer does not depend on its batch")
    lora: bool = option(True, help="train LoRA adapters (through peft) and the projection on a frozen base "
                                   "(false: the whole decoder and the projection)")
    lora_r: int = option(128, minimum=1, help="LoRA rank")
    lora_alpha: float = option(32.0, above=0.0, help="LoRA alpha (scaling alpha / r; 0 would silence the "
                                                     "adapters)")
    lora_dropout: float = option(0.1, minimum=0.0, check=dropout_probability,
                                 help="LoRA dropout (the reference hard-codes 0.1 whatever its argument says)")
    lora_targets: list[str] = option(factory=list, help="the modules that get adapters; empty: per family, as the "
                                                        "reference (GPT-2 c_attn, c_proj, c_fc; Llama-class q, k, "
                                                        "v, o, up, down and gate projections)")
    export_adapter: bool = option(True, help="also export the adapters alone (export/adapter, peft's format) "
                                             "beside the merged model")


METHOD = register(Method(
    name="codi",
    title="CODI (continuous thoughts by self-distillation, Shen et al. 2025)",
    section=CodiConfig,
    demo="demo_codi.yaml",
    stages=(
        StageSpec("codi", "icot.methods.codi.stage:CodiStage",
                  "self-distillation: one LoRA model as teacher (explicit CoT) and student (N continuous thoughts "
                  "through a projection), aligned at the token that predicts the answer",
                  reads={"start": "teacher"}, views=("cot",),
                  mode=Mode("codi", "CODI (continuous thoughts)", "cot_removed",
                            "icot.methods.codi.modes:CodiModeModel")),
    ),
))
