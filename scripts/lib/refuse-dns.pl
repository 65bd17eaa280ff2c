#!/usr/bin/perl
# A DNS server on 127.0.0.1 that answers every query with REFUSED, for the
# rspamd that the tests and CI run. Its lookups then fail at once instead
# of waiting for time-outs (5 s per message with nothing listening), and
# it never reaches a real resolver.
#
# Usage: refuse-dns.pl [PORT]. Port 0, the default, picks a free port.
# Prints the UDP port it listens on as one line, then serves until killed.
use strict;
use warnings;
use IO::Socket::INET;

my $port = shift // 0;
my $socket = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $port,
    Proto     => 'udp',
) or die "refuse-dns: cannot listen on 127.0.0.1:$port: $!\n";
$| = 1;
print $socket->sockport(), "\n";

while (1) {
    my $query = '';
    my $peer = $socket->recv($query, 4096);
    next unless defined $peer && length($query) >= 12;
    my ($id, $flags, $questions) = unpack('n n n', $query);
    next if $flags & 0x8000;    # a response, not a query

    # Keep the question when there is exactly one and it parses, so the
    # client can match the answer to its query.
    my $question = '';
    if ($questions == 1) {
        my $offset = 12;
        while ($offset < length($query)) {
            my $label = ord(substr($query, $offset, 1));
            last if $label == 0 || $label >= 0xc0;
            $offset += 1 + $label;
        }
        if ($offset < length($query) && ord(substr($query, $offset, 1)) == 0
            && $offset + 5 <= length($query)) {
            $question = substr($query, 12, $offset + 5 - 12);
        }
    }
    # QR set, opcode and RD copied from the query, RCODE 5 (REFUSED).
    my $reply_flags = 0x8000 | ($flags & 0x7900) | 5;
    my $header = pack('n n n n n n', $id, $reply_flags, $question eq '' ? 0 : 1, 0, 0, 0);
    $socket->send($header . $question, 0, $peer);
}
