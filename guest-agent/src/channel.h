/* The agent channel: a vsock connection or a virtio-serial port carrying framed messages (protocol.toml).
 * Both transports are one non-blocking byte stream; everything past opening is shared. */
#ifndef KVMPOD_CHANNEL_H
#define KVMPOD_CHANNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "frame.h"
#include "messages.h"
#include "util.h"

/* Finds the virtio-serial port called `name` and opens it; fatal (stage "channel") on timeout. */
void channel_open(const char *name);

/* Listens on AF_VSOCK `port` and accepts the host's connection; fatal (stage "channel") on failure. */
void channel_open_vsock(uint32_t port);

/* True once the port is open: fatal errors are then also sent as ERROR frames. */
bool channel_is_open(void);
int channel_fd(void);

/* Waits until the host end of the port is connected (it may connect after the guest is up). */
void channel_wait_for_host(void);

/* Writes one whole frame, waiting while the port is full; powers off if the host has gone.
 * len must not exceed KP_MAX_PAYLOAD. */
void channel_send(uint16_t type, uint32_t stream, const void *payload, size_t len);

/* Output moved to the channel without passing through the agent: channel_stage() splices up to `max`
 * bytes of the pipe `pipe_fd` (the agent's end of a process's output) into a staging pipe and returns
 * splice()'s result: bytes staged, 0 at EOF, -1 with errno EAGAIN when it is empty, EINVAL when it
 * cannot be spliced (read it instead). A frame of everything staged is then sent by
 * channel_send_staged(). virtio_console takes the pages as they are; a vsock socket copies them once. */
ssize_t channel_stage(int pipe_fd, size_t max);
void channel_send_staged(uint16_t type, uint32_t stream);
/* Where channel_send() builds a frame's payload (KP_MAX_PAYLOAD bytes): data read straight into it is
 * sent without a copy. Valid until the next channel_send(). */
uint8_t *channel_payload_space(void);
/* Encodes and sends a message struct of messages.h: channel_send_msg(stream, &(struct kp_started){...}).
 * KP_DESC checks at compile time that it is one and picks its table. (Variadic: a compound literal's
 * commas.) */
#define channel_send_msg(stream, ...) channel_send_message(KP_DESC(__VA_ARGS__), (stream), (__VA_ARGS__))
void channel_send_message(const struct kp_msg_desc *d, uint32_t stream, const void *msg);

/* ERROR(STAGE, ERRNO if any, MESSAGE): a failed START on a process stream, the end on stream 0. */
void channel_send_error(uint32_t stream, const struct failure *f);

/* Reads what the host has sent so far. Returns false once the host has gone (EOF or error);
 * frames that arrived before that can still be taken with channel_next(). */
bool channel_fill(void);

/* Takes the next complete frame (frame_reader_next); one that breaks the protocol is fatal (stage
 * "protocol"). Its payload is valid until the next channel_fill(). */
bool channel_next(struct frame *f);

#endif
