"""Model layer: plain `nn.Module`s, decoder-agnostic, no DeepSpeed imports."""

from icot.models.coupled import CoupledModel
from icot.models.decoder import build_decoder, decoder_blocks, decoder_shape, load_decoder
from icot.models.emulator import Emulator, EmulatorOutput
from icot.models.student import Student
from icot.models.teacher_states import diagonal_positions, teacher_states

__all__ = [
    "CoupledModel", "Emulator", "EmulatorOutput", "Student", "build_decoder", "decoder_blocks",
    "decoder_shape", "diagonal_positions", "load_decoder", "teacher_states",
]
