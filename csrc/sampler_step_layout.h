// The columns of a row of the fused sampler step's coefficient table ([S, K] or [S, B, K]):
// the one definition for csrc/. d2nwg/ops/sampler_step_op.py defines the same names (G, AX, ...)
// for Python and passes them to the Triton kernel as constexprs; tests/test_sampler_step.py
// checks that this header and the Python names agree. Meaning: d2nwg/ops/sampler_step_op.py.
#pragma once

namespace d2nwg {
namespace sampler_col {

constexpr int kG = 0;   // classifier-free guidance scale
constexpr int kAX = 1;  // x0 = AX * x + AO * o       (prediction -> data)
constexpr int kAO = 2;
constexpr int kEX = 3;  // eps = EX * x + EO * o      (prediction -> noise)
constexpr int kEO = 4;
constexpr int kCX = 5;  // next = CX * x + C0 * x0 + CE * eps + CP * prev_x0 + CP2 * prev2_x0
constexpr int kC0 = 6;  //        + CZ * noise
constexpr int kCE = 7;
constexpr int kCP = 8;
constexpr int kCZ = 9;
constexpr int kCP2 = 10;  // (last, so that the columns before it kept their indices)
constexpr int kK = 11;    // columns per row

}  // namespace sampler_col
}  // namespace d2nwg
