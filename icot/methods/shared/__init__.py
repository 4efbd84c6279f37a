"""The stages every method's run shares: the explicit-CoT teacher (which ICoT-KD distils and other
methods start from) and the no-CoT baseline, each with its evaluation mode."""

from icot.registry import Method, Mode, StageSpec, register

METHOD = register(Method(
    name="shared",
    title="shared stages (the explicit-CoT teacher and the no-CoT baseline)",
    shared=True,
    stages=(
        StageSpec("no_cot", "icot.methods.shared.no_cot:NoCotStage",
                  "the no-CoT baseline: a decoder trained to answer right after the input",
                  views=("nocot",),
                  mode=Mode("no_cot", "No CoT", "nocot", "icot.methods.shared.modes:NoCotModel")),
        StageSpec("teacher", "icot.methods.shared.teacher:TeacherStage",
                  "the teacher: a decoder fine-tuned on explicit CoT (input <sep> cot <sep> answer <sep>)",
                  views=("cot",),
                  mode=Mode("explicit", "Explicit CoT (teacher)", "cot", "icot.methods.shared.modes:ExplicitModel")),
    ),
))
