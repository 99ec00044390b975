"""PTX text for the inline assembly of the Triton integer kernels (a GPU only: Triton's
interpreter has no inline assembly, and there the kernels take their elementwise path).

Packed int4 to int8, four bytes (eight nibbles) of a 32-bit register at a time: the low
nibbles into one register, the high ones into another, each byte b sign-extended as
((b ^ 8) + 0x78) ^ 0x80 = b - 16 * (b >= 8); no carry leaves a byte, since b ^ 8 + 0x78 <=
0x87. Elementwise int32 code took 1698 instructions per K block of a W4A8 128 x 128 x 128 GEMM
tile (sm_90 SASS) against 174 for int8, and 8.4 per k in the batch-1 GEMV.
"""


def unpack_signed(src: str, lo: str, hi: str, tmp: str) -> str:
    """Instructions writing the sign-extended low nibbles of register `src` to `lo` and the
    high ones to `hi` (`tmp` a scratch register)."""
    def extend(dst):  # tmp's four nibbles (bits 0-3 of each byte) into dst's four bytes
        return (f"xor.b32 {tmp}, {tmp}, 0x08080808;\nadd.u32 {tmp}, {tmp}, 0x78787878;\n"
                f"xor.b32 {dst}, {tmp}, 0x80808080;\n")
    return (f"and.b32 {tmp}, {src}, 0x0F0F0F0F;\n" + extend(lo)
            + f"shr.u32 {tmp}, {src}, 4;\nand.b32 {tmp}, {tmp}, 0x0F0F0F0F;\n" + extend(hi))
