# U-Boot side of the otabox A/B protocol (variables set with fw_setenv).
# Build with: mkimage -A arm -T script -C none -d boot.cmd boot.scr
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv otabox_slot
for slot in ${BOOT_ORDER}; do
  if test -z "${otabox_slot}"; then
    if test "${slot}" = "A" && test ${BOOT_A_LEFT} -gt 0; then
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      setenv otabox_slot A; setenv otabox_part 2
    elif test "${slot}" = "B" && test ${BOOT_B_LEFT} -gt 0; then
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      setenv otabox_slot B; setenv otabox_part 3
    fi
  fi
done
saveenv

setenv bootargs "root=/dev/mmcblk0p${otabox_part} ro otabox.slot=${otabox_slot}"
load mmc 0:${otabox_part} ${kernel_addr_r} /boot/Image
booti ${kernel_addr_r} - ${fdt_addr}
