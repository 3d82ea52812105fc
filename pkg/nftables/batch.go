package nftables

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	gnft "github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

// Why a custom transport: google/nftables asks the kernel to acknowledge every
// message of a batch (and to echo every new rule) and then reads the answers
// one recvmsg at a time. At 10k Services a cold start is ~150k messages, and
// those answers cost more than the kernel's work on the ruleset itself. So
// the library still builds and encodes every message (Conn.AddRule,
// SetAddElements, …, Conn.Flush), but its socket is a capture (nltest.Dial);
// the captured messages are sent here as one batch on a real socket with the
// ack flag only on the last message. Encoding rules is the costliest part of
// a cold start on the Go side, so it is split over several captures in
// parallel (rule order matters only within a chain). The kernel still
// reports every failing message (errors are always sent), and the ack of the
// last message arrives only after the whole batch was committed or aborted,
// so the all-or-nothing semantics are unchanged.

// capture is a google/nftables connection whose Flush hands the encoded
// messages to us instead of the kernel.
type capture struct {
	conn *gnft.Conn
	msgs []netlink.Message
}

func newCapture() (*capture, error) {
	c := &capture{}
	conn, err := gnft.New(gnft.WithTestDial(c.handle))
	if err != nil {
		return nil, fmt.Errorf("opening nftables encoder: %w", err)
	}
	c.conn = conn
	return c, nil
}

// handle receives the library's batch (BATCH_BEGIN … BATCH_END) on the first
// call; later calls (reqs == nil) are the library reading one ack per message,
// which all succeed here because nothing was sent yet.
func (c *capture) handle(reqs []netlink.Message) ([]netlink.Message, error) {
	if len(reqs) >= 2 {
		c.msgs = append(c.msgs, reqs[1:len(reqs)-1]...)
	}
	return []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 20)}}, nil
}

// messages flushes the library's buffer into c.msgs and returns them.
func (c *capture) messages() ([]netlink.Message, error) {
	if err := c.conn.Flush(); err != nil {
		return nil, fmt.Errorf("encoding nftables messages: %w", err)
	}
	return c.msgs, nil
}

// batchSender sends one batch on a real socket.
type batchSender struct {
	netns          int
	sndbuf, rcvbuf int
}

func batchControl(t uint16) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(t), Flags: netlink.Request},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES},
	}
}

// send writes the batch on a real NETLINK_NETFILTER socket and waits for the
// ack of its last message, collecting any error the kernel reports.
func (s *batchSender) send(body []netlink.Message) error {
	if len(body) == 0 {
		return errors.New("empty batch")
	}
	reqs := make([]netlink.Message, 0, len(body)+2)
	reqs = append(reqs, batchControl(unix.NFNL_MSG_BATCH_BEGIN))
	reqs = append(reqs, body...)
	reqs = append(reqs, batchControl(unix.NFNL_MSG_BATCH_END))
	nl, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: s.netns})
	if err != nil {
		return fmt.Errorf("dialing netlink: %w", err)
	}
	defer nl.Close()
	raw, err := nl.SyscallConn()
	if err != nil {
		return fmt.Errorf("netlink raw conn: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = errors.Join(
			setBuf(int(fd), unix.SO_SNDBUFFORCE, unix.SO_SNDBUF, s.sndbuf),
			setBuf(int(fd), unix.SO_RCVBUFFORCE, unix.SO_RCVBUF, s.rcvbuf))
	}); err != nil {
		return fmt.Errorf("netlink socket control: %w", err)
	}
	if serr != nil {
		return serr
	}

	// Sequence numbers identify which message an error is about.
	last := len(reqs) - 2 // reqs[0] is BATCH_BEGIN, reqs[len-1] BATCH_END
	for i := range reqs {
		reqs[i].Header.Sequence = uint32(i + 1)
		// The library also asks for an echo of every new rule (it
		// reads back handles); nothing here needs them.
		reqs[i].Header.Flags &^= netlink.Echo
		if i >= 1 && i < last {
			reqs[i].Header.Flags &^= netlink.Acknowledge
		}
	}
	reqs[last].Header.Flags |= netlink.Acknowledge
	lastSeq := reqs[last].Header.Sequence

	// Encode into one buffer sized up front: the batch can be ~100 MB at
	// 30k Services, and growing it by append dominated the sync's CPU.
	align := func(n int) int { return (n + 3) &^ 3 }
	total := 0
	for _, m := range reqs {
		total += align(unix.NLMSG_HDRLEN + len(m.Data))
	}
	buf := make([]byte, total)
	off := 0
	for _, m := range reqs {
		l := unix.NLMSG_HDRLEN + len(m.Data)
		binary.NativeEndian.PutUint32(buf[off:], uint32(l))
		binary.NativeEndian.PutUint16(buf[off+4:], uint16(m.Header.Type))
		binary.NativeEndian.PutUint16(buf[off+6:], uint16(m.Header.Flags))
		binary.NativeEndian.PutUint32(buf[off+8:], m.Header.Sequence)
		binary.NativeEndian.PutUint32(buf[off+12:], 0)
		copy(buf[off+unix.NLMSG_HDRLEN:], m.Data)
		off += align(l)
	}
	var werr error
	if err := raw.Write(func(fd uintptr) bool {
		werr = unix.Sendto(int(fd), buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return !errors.Is(werr, unix.EAGAIN)
	}); err != nil {
		return fmt.Errorf("sending batch: %w", err)
	}
	if werr != nil {
		return fmt.Errorf("sending batch of %d bytes: %w", len(buf), werr)
	}

	// The kernel answers after the commit; bound the wait anyway.
	deadline := time.Now().Add(2 * time.Minute)
	if err := nl.SetReadDeadline(deadline); err != nil {
		return fmt.Errorf("netlink read deadline: %w", err)
	}
	var errs []error
	rb := make([]byte, 1<<16)
	for {
		if time.Now().After(deadline) {
			return errors.New("timed out waiting for the batch acknowledgement")
		}
		var n int
		var rerr error
		if err := raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), rb, 0)
			return !errors.Is(rerr, unix.EAGAIN)
		}); err != nil {
			return fmt.Errorf("reading batch acknowledgement: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("reading batch acknowledgement: %w", os.NewSyscallError("recvfrom", rerr))
		}
		msgs, err := syscall.ParseNetlinkMessage(rb[:n])
		if err != nil {
			return fmt.Errorf("parsing batch acknowledgement: %w", err)
		}
		done := false
		for _, m := range msgs {
			if m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			if errno := -int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
				i := int(m.Header.Seq) - 1
				what := "message"
				if i >= 0 && i < len(reqs) {
					what = msgName(reqs[i].Header.Type)
				}
				errs = append(errs, fmt.Errorf("%s #%d: %w", what, i, syscall.Errno(errno)))
			}
			if m.Header.Seq == lastSeq {
				done = true
			}
		}
		if done {
			return errors.Join(errs...)
		}
	}
}

func msgName(t netlink.HeaderType) string {
	switch int(t) & 0xff {
	case unix.NFT_MSG_NEWTABLE:
		return "add table"
	case unix.NFT_MSG_DELTABLE:
		return "delete table"
	case unix.NFT_MSG_NEWCHAIN:
		return "add chain"
	case unix.NFT_MSG_DELCHAIN:
		return "delete chain"
	case unix.NFT_MSG_NEWRULE:
		return "add rule"
	case unix.NFT_MSG_DELRULE:
		return "delete rule"
	case unix.NFT_MSG_NEWSET:
		return "add set"
	case unix.NFT_MSG_DELSET:
		return "delete set"
	case unix.NFT_MSG_NEWSETELEM:
		return "add element"
	case unix.NFT_MSG_DELSETELEM:
		return "delete element"
	}
	return fmt.Sprintf("message type %d", t)
}

var _ nltest.Func = (&capture{}).handle
